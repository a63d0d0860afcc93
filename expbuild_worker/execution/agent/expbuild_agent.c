/*
 * expbuild-agent: the worker's native helper, in two roles.
 *
 * 1. `expbuild-agent SOCKET`: PID 1 of a Docker pool container (below).
 * 2. `expbuild-agent --placed PARENT CGROUP_PROCS...`: a host action's placed child. The worker
 *    starts it (posix_spawn) ahead of need with its end of a SOCK_SEQPACKET pair as descriptor 3;
 *    it dies with PARENT (the worker), enters the listed cgroups (writes 0 to each cgroup.procs),
 *    waits for one RUN (body: cwd, executable, uid, gid, rlimit count, that many kind/value
 *    pairs, then argv and the environment, all NUL-ended; descriptors: stdin (optional),
 *    stdout, stderr and last the write end of an exec status pipe), and becomes the command:
 *    new session, stdio, working directory, user (no supplementary groups), rlimits, default
 *    SIGPIPE/SIGXFSZ, exec with exactly the given environment. A failure goes to the status
 *    pipe as a marshal'd (kind, errno, filename, text) tuple, the form the worker's spawner
 *    process reports a failed fork in; a successful exec closes the pipe. Being a small static
 *    program, it costs the worker a vfork and the command an exec: no fork of the worker's
 *    address space, and no round trip through another process.
 *
 * 3. `expbuild-agent --resident PARENT CGROUP_PROCS...`: a helper that stays in a host action's
 *    cgroups (which the worker reuses) and, for each RUN as above, clones the command with
 *    CLONE_PARENT (the worker's child, born inside those cgroups: no migration), appends its
 *    pid to the exec status pipe, and waits for the next (see resident_main).
 *
 * Role 1 starts commands inside a pool container for the worker, without the engine.
 *
 * Entering a running container through the engine (`docker exec`) costs the engine's API calls
 * and a whole OCI runtime start per command. The agent is the container's PID 1 instead: it
 * connects once to a Unix socket the worker bound into the container (read-only), and for each
 * request forks the command with the stdio pipes the worker passed over that socket. The
 * command inherits exactly what the agent has: the container's namespaces, cgroup, seccomp
 * profile, capabilities (none), no-new-privileges and user, as an exec'd process would.
 *
 * Protocol (SOCK_SEQPACKET, every message starts with struct header):
 *   agent -> worker  READY                 once connected (a = protocol version)
 *   worker -> agent  RUN a=body bytes b=argc c=envc, with SCM_RIGHTS stdin, stdout, stderr;
 *                    then the body in messages of at most BODY_PIECE bytes (no header):
 *                    cwd NUL, argc strings NUL-ended, envc "KEY=VALUE" strings NUL-ended
 *   child -> worker  PID                   sent by the command's own process before exec, so
 *                                          the kernel's credentials carry its pid as the worker
 *                                          sees it
 *   agent -> worker  STARTED a=pid | FAILED a=errno b=stage | EXITED a=wait status
 *   worker -> agent  SIGNAL a=signal       to the running command
 *   worker -> agent  CHECK                 between actions (every command reaped):
 *   agent -> worker  CHECKED a=0 | a=1 b=what changed | a=2 (a command is still running)
 * The connection closing ends the agent, and with it the container.
 *
 * PID 1 of a PID namespace gets no signal from inside it that it has no handler for, and a
 * non-dumpable process cannot be traced or read through /proc by the same user: the command
 * cannot take over the agent to reach the next action. What the same user may still change of
 * another process of its own (resource limits, nice value, I/O priority, CPU affinity,
 * scheduling policy, OOM score) would pass to every later command: the agent notes all of it
 * at start and CHECK tells whether any of it changed, so the worker never hands such a
 * container out again. The agent is also the container's init: it reaps every orphan.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sched.h>
#include <grp.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

enum {
    PROTOCOL_VERSION = 1,
    MSG_READY = 1,
    MSG_RUN = 2,
    MSG_SIGNAL = 3,
    MSG_PID = 4,
    MSG_STARTED = 5,
    MSG_FAILED = 6,
    MSG_EXITED = 7,
    MSG_CHECK = 8,
    MSG_CHECKED = 9,
};

enum { STAGE_REQUEST = 1, STAGE_FORK = 2, STAGE_CHDIR = 3, STAGE_EXEC = 4, STAGE_STDIO = 5 };

#define BODY_PIECE 65536
#define BODY_MAX (64u << 20)
#define DEFAULT_PATH "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

struct header {
    uint32_t kind;
    int32_t a;
    int32_t b;
    int32_t c;
};

extern char **environ;

/* What a process of the same user may change of the agent, and every later command inherits. */
struct inheritable {
    struct rlimit limits[RLIM_NLIMITS];
    int nice;
    long ioprio;
    int policy;
    struct sched_param param;
    cpu_set_t cpus;
    char oom_score_adj[16];
};

enum { CHANGED_LIMITS = 1, CHANGED_NICE, CHANGED_IOPRIO, CHANGED_POLICY, CHANGED_CPUS, CHANGED_OOM };

static void note_inheritable(struct inheritable *now) {
    memset(now, 0, sizeof *now);
    for (int i = 0; i < RLIM_NLIMITS; i++)
        getrlimit(i, &now->limits[i]);
    errno = 0;
    now->nice = getpriority(PRIO_PROCESS, 0);
    now->ioprio = syscall(SYS_ioprio_get, 1 /* IOPRIO_WHO_PROCESS */, 0);
    now->policy = sched_getscheduler(0);
    sched_getparam(0, &now->param);
    sched_getaffinity(0, sizeof now->cpus, &now->cpus);
    int fd = open("/proc/self/oom_score_adj", O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        (void)!read(fd, now->oom_score_adj, sizeof now->oom_score_adj - 1);
        close(fd);
    }
}

/* 0 when nothing inheritable changed since `before`, else which kind of thing did. */
static int changed_since(const struct inheritable *before) {
    struct inheritable now;
    note_inheritable(&now);
    if (memcmp(now.limits, before->limits, sizeof now.limits) != 0)
        return CHANGED_LIMITS;
    if (now.nice != before->nice)
        return CHANGED_NICE;
    if (now.ioprio != before->ioprio)
        return CHANGED_IOPRIO;
    if (now.policy != before->policy || now.param.sched_priority != before->param.sched_priority)
        return CHANGED_POLICY;
    if (!CPU_EQUAL(&now.cpus, &before->cpus))
        return CHANGED_CPUS;
    if (strcmp(now.oom_score_adj, before->oom_score_adj) != 0)
        return CHANGED_OOM;
    return 0;
}

static int control = -1;

static void say(uint32_t kind, int32_t a, int32_t b) {
    struct header h = {kind, a, b, 0};
    while (send(control, &h, sizeof h, MSG_NOSIGNAL) < 0) {
        if (errno != EINTR)
            _exit(0); /* the worker is gone: so is the container */
    }
}

static void fail_fast(const char *what) {
    dprintf(2, "expbuild-agent: %s: %s\n", what, strerror(errno));
    _exit(111);
}

/* Receive one message with at most `max` descriptors (at most 4); the message's length, 0 at
 * end-of-file or on error; *count tells how many descriptors came. */
static ssize_t receive_message(struct header *h, int *fds, int max, int *count) {
    union {
        char buf[CMSG_SPACE(4 * sizeof(int))];
        struct cmsghdr align;
    } control_buf;
    struct iovec iov = {h, sizeof *h};
    struct msghdr msg = {0};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control_buf.buf;
    msg.msg_controllen = sizeof control_buf.buf;
    ssize_t n;
    do {
        n = recvmsg(control, &msg, MSG_CMSG_CLOEXEC);
    } while (n < 0 && errno == EINTR);
    *count = 0;
    if (n <= 0)
        return 0;
    for (int i = 0; i < max; i++)
        fds[i] = -1;
    int got = 0;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c != NULL; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
            int passed_count = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
            int *passed = (int *)CMSG_DATA(c);
            for (int i = 0; i < passed_count; i++) {
                if (got < max)
                    fds[got++] = passed[i];
                else
                    close(passed[i]);
            }
        }
    }
    *count = got;
    if ((size_t)n != sizeof *h)
        h->kind = 0;
    return n;
}

/* Receive one RUN header with its three descriptors; 0 on EOF, -1 for a RUN without them. */
static int receive_run(struct header *h, int fds[3]) {
    int count;
    if (receive_message(h, fds, 3, &count) <= 0)
        return 0;
    return count == 3 || h->kind != MSG_RUN ? 1 : -1;
}

static void close_fds(int fds[3]) {
    for (int i = 0; i < 3; i++)
        if (fds[i] >= 0)
            close(fds[i]);
}

/* The request's body: all of it, or NULL when it is malformed (the connection is then useless). */
static char *receive_body(uint32_t size) {
    if (size == 0 || size > BODY_MAX)
        return NULL;
    char *body = malloc(size + 1);
    if (body == NULL)
        return NULL;
    uint32_t have = 0;
    while (have < size) {
        ssize_t n = recv(control, body + have, size - have < BODY_PIECE ? size - have : BODY_PIECE, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            free(body);
            return NULL;
        }
        have += (uint32_t)n;
    }
    body[size] = '\0';
    return body;
}

/* Split `count` NUL-ended strings off *cursor; NULL when the body runs out first. */
static char **take_strings(char **cursor, const char *end, int32_t count, int extra) {
    if (count < 0 || count > (1 << 22))
        return NULL;
    char **out = calloc((size_t)count + (size_t)extra + 1, sizeof *out);
    if (out == NULL)
        return NULL;
    for (int32_t i = 0; i < count; i++) {
        if (*cursor >= end) {
            free(out);
            return NULL;
        }
        out[i] = *cursor;
        *cursor += strlen(*cursor) + 1;
    }
    return out;
}

/* The agent's environment (the container's: image ENV, PATH, HOSTNAME, HOME) overlaid with the
 * request's, as the engine merges an exec's environment with the container's. */
static char **merge_environment(char **requested, int32_t count) {
    size_t own = 0;
    while (environ[own] != NULL)
        own++;
    char **out = calloc(own + (size_t)count + 1, sizeof *out);
    if (out == NULL)
        return NULL;
    size_t n = 0;
    for (size_t i = 0; i < own; i++) {
        size_t key = strcspn(environ[i], "=");
        int overridden = 0;
        for (int32_t j = 0; j < count && !overridden; j++)
            overridden = strncmp(requested[j], environ[i], key) == 0 && requested[j][key] == '=';
        if (!overridden)
            out[n++] = environ[i];
    }
    for (int32_t j = 0; j < count; j++)
        out[n++] = requested[j];
    out[n] = NULL;
    return out;
}

static const char *lookup(char **env, const char *key) {
    size_t len = strlen(key);
    for (; *env != NULL; env++)
        if (strncmp(*env, key, len) == 0 && (*env)[len] == '=')
            return *env + len + 1;
    return NULL;
}

/* execve argv[0], searched in the command's PATH when it has no slash (as the runtime does);
 * returns the errno that explains the failure. */
static int execute(char **argv, char **env) {
    if (strchr(argv[0], '/') != NULL) {
        execve(argv[0], argv, env);
        return errno;
    }
    const char *path = lookup(env, "PATH");
    if (path == NULL)
        path = DEFAULT_PATH;
    size_t name_len = strlen(argv[0]);
    int denied = 0;
    for (const char *p = path;; p++) {
        const char *colon = strchrnul(p, ':');
        size_t dir_len = (size_t)(colon - p);
        char *candidate = malloc(dir_len + name_len + 3);
        if (candidate == NULL)
            return ENOMEM;
        if (dir_len == 0)
            candidate[0] = '.', dir_len = 1;
        else
            memcpy(candidate, p, dir_len);
        candidate[dir_len] = '/';
        memcpy(candidate + dir_len + 1, argv[0], name_len + 1);
        execve(candidate, argv, env);
        int err = errno;
        free(candidate);
        if (err == EACCES)
            denied = 1;
        else if (err != ENOENT && err != ENOTDIR && err != ELOOP && err != ENAMETOOLONG)
            return err;
        if (*colon == '\0')
            break;
        p = colon;
    }
    return denied ? EACCES : ENOENT;
}

/* The command's side of the fork: never returns. Failures go to `report` as (stage, errno). */
static void become_command(int fds[3], const char *cwd, char **argv, char **env, int report) {
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    setsid();
    int failure[2] = {STAGE_STDIO, 0};
    for (int i = 0; i < 3; i++) {
        if (dup2(fds[i], i) < 0) {
            failure[1] = errno;
            goto failed;
        }
    }
    struct header pid_message = {MSG_PID, 0, 0, 0};
    send(control, &pid_message, sizeof pid_message, MSG_NOSIGNAL);
    if (chdir(cwd) != 0) {
        failure[0] = STAGE_CHDIR;
        failure[1] = errno;
        goto failed;
    }
    failure[0] = STAGE_EXEC;
    failure[1] = execute(argv, env);
failed:
    (void)!write(report, failure, sizeof failure);
    _exit(127);
}

/* Start the requested command; its pid, or 0 when it did not start (FAILED was sent). */
static pid_t start_command(const struct header *h, int fds[3]) {
    char *body = receive_body((uint32_t)h->a);
    if (body == NULL) {
        close_fds(fds);
        say(MSG_FAILED, EINVAL, STAGE_REQUEST);
        _exit(0); /* a torn request: the stream cannot be trusted any more */
    }
    char *cursor = body, *end = body + (uint32_t)h->a;
    const char *cwd = cursor;
    cursor += strlen(cursor) + 1;
    char **argv = take_strings(&cursor, end, h->b, 0);
    char **requested = argv != NULL ? take_strings(&cursor, end, h->c, 0) : NULL;
    char **env = requested != NULL ? merge_environment(requested, h->c) : NULL;
    pid_t child = 0;
    int report[2] = {-1, -1};
    if (env == NULL || h->b < 1) {
        say(MSG_FAILED, EINVAL, STAGE_REQUEST);
    } else if (pipe2(report, O_CLOEXEC) != 0) {
        say(MSG_FAILED, errno, STAGE_FORK);
    } else if ((child = fork()) < 0) {
        say(MSG_FAILED, errno, STAGE_FORK);
        child = 0;
    } else if (child == 0) {
        close(report[0]);
        become_command(fds, cwd, argv, env, report[1]);
    }
    if (report[1] >= 0)
        close(report[1]);
    close_fds(fds);
    if (child > 0) {
        int failure[2];
        ssize_t n;
        do {
            n = read(report[0], failure, sizeof failure);
        } while (n < 0 && errno == EINTR);
        if (n == (ssize_t)sizeof failure) {
            say(MSG_FAILED, failure[1], failure[0]);
            child = -child; /* reaped quietly */
        } else {
            say(MSG_STARTED, child, 0);
        }
    }
    if (report[0] >= 0)
        close(report[0]);
    free(env);
    free(requested);
    free(argv);
    free(body);
    return child;
}

/* ---- role 2: a host action's placed child ------------------------------------------------ */

#define MARSHAL_TEXT_MAX 2048

/* The length of the longest prefix of `text` (at most `max` bytes) that is whole UTF-8; -1 when
 * `text` is not UTF-8 at all within that prefix. */
static long utf8_prefix(const char *text, size_t max) {
    const unsigned char *p = (const unsigned char *)text;
    size_t i = 0;
    while (p[i] != 0) {
        size_t len = p[i] < 0x80 ? 1 : (p[i] >> 5) == 6 ? 2 : (p[i] >> 4) == 14 ? 3 : (p[i] >> 3) == 30 ? 4 : 0;
        if (len == 0)
            return -1;
        for (size_t k = 1; k < len; k++)
            if ((p[i + k] & 0xC0) != 0x80)
                return -1;
        if (i + len > max)
            break; /* cut before a character that would not fit */
        i += len;
    }
    return (long)i;
}

/* Append `text` as a marshal'd str (at most MARSHAL_TEXT_MAX bytes of it), or None when it is
 * NULL or not UTF-8; `out` has room for 5 + MARSHAL_TEXT_MAX bytes. */
static size_t marshal_text(char *out, const char *text) {
    long len = text != NULL ? utf8_prefix(text, MARSHAL_TEXT_MAX) : -1;
    if (len < 0) {
        out[0] = 'N';
        return 1;
    }
    uint32_t size = (uint32_t)len;
    out[0] = 'u';
    memcpy(out + 1, &size, 4); /* little-endian: the only byte order this is built for */
    memcpy(out + 5, text, size);
    return 5 + (size_t)size;
}

/* Write (kind, errno, filename, text) to `fd` as marshal would. */
static void write_failure(int fd, const char *kind, int number, const char *filename, const char *text) {
    char out[2 + 3 * (5 + MARSHAL_TEXT_MAX) + 5];
    size_t n = 0;
    int32_t value = number;
    out[n++] = ')'; /* a small tuple */
    out[n++] = 4;
    n += marshal_text(out + n, kind);
    out[n++] = 'i';
    memcpy(out + n, &value, 4);
    n += 4;
    n += marshal_text(out + n, filename);
    n += marshal_text(out + n, text);
    (void)!write(fd, out, n);
}

/* The same, then end: the command never runs. */
static void placed_failed(int fd, const char *kind, int number, const char *filename, const char *text) {
    write_failure(fd, kind, number, filename, text);
    _exit(127);
}

/* Close every descriptor from `low` to `high`: close_range (Linux 5.9), else one by one from
 * /proc/self/fd, so a kernel without it never passes the worker's descriptors on. */
static void close_from(unsigned low, unsigned high) {
    if (low > high || syscall(SYS_close_range, low, high, 0u) == 0)
        return;
    DIR *listing = opendir("/proc/self/fd");
    if (listing == NULL) { /* no /proc either: every possible descriptor, one by one */
        struct rlimit most;
        unsigned last = getrlimit(RLIMIT_NOFILE, &most) == 0 && most.rlim_cur != RLIM_INFINITY
                            ? (unsigned)most.rlim_cur - 1 : 65535u;
        for (unsigned fd = low; fd <= high && fd <= last; fd++)
            close((int)fd);
        return;
    }
    int own = dirfd(listing);
    int found[256];
    int count;
    do { /* closing while listing may skip entries: list again until nothing is left */
        count = 0;
        rewinddir(listing);
        for (struct dirent *entry; (entry = readdir(listing)) != NULL && count < 256;) {
            char *end;
            long fd = strtol(entry->d_name, &end, 10);
            if (*end == '\0' && end != entry->d_name && fd != own && fd >= (long)low && fd <= (long)high)
                found[count++] = (int)fd;
        }
        for (int i = 0; i < count; i++)
            close(found[i]);
    } while (count > 0);
    closedir(listing);
}

static void die_with(pid_t parent) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent)
        _exit(1); /* the parent ended before the death signal was set */
}

/* Enter the cgroups whose cgroup.procs files are listed: 0, or the errno with *path set. */
static int enter_cgroups(char **procs, int count, const char **path) {
    for (int i = 0; i < count; i++) {
        int fd = open(procs[i], O_WRONLY | O_CLOEXEC);
        int err = fd < 0 || write(fd, "0", 1) != 1 ? errno : 0;
        if (fd >= 0)
            close(fd);
        if (err != 0) {
            *path = procs[i];
            return err;
        }
    }
    return 0;
}

/* One RUN for a placed or resident helper, parsed; `body` owns the strings. */
struct placed_run {
    int fds[4];
    int count;
    int status; /* the exec status pipe's write end, last of the descriptors */
    char *body;
    char **head, **limit_values, **command, **env;
    int32_t limits;
};

static void free_run(struct placed_run *run) {
    for (int i = 0; i < run->count; i++)
        close(run->fds[i]);
    free(run->env);
    free(run->command);
    free(run->limit_values);
    free(run->head);
    free(run->body);
    memset(run, 0, sizeof *run);
}

/* Receive one RUN: 1 when parsed, 0 at end-of-file (the worker closed our socket), -1 when it
 * is unusable. With -1 and run->status >= 0, *problem says why and the status pipe is there to
 * tell the worker; with -1 and no status pipe, the stream cannot be trusted any more. */
static int receive_placed_run(struct placed_run *run, const char **problem) {
    struct header h;
    memset(run, 0, sizeof *run);
    run->status = -1;
    if (receive_message(&h, run->fds, 4, &run->count) <= 0)
        return 0;
    if (h.kind != MSG_RUN || (run->count != 3 && run->count != 4))
        return -1;
    run->status = run->fds[run->count - 1];
    *problem = "the placed child got a torn request";
    run->body = receive_body((uint32_t)h.a);
    if (run->body == NULL)
        return -1;
    *problem = "the placed child got a malformed request";
    char *cursor = run->body, *end = run->body + (uint32_t)h.a;
    run->head = take_strings(&cursor, end, 5, 0);
    if (run->head == NULL)
        return -1;
    run->limits = (int32_t)strtol(run->head[4], NULL, 10);
    run->limit_values = take_strings(&cursor, end, 2 * run->limits, 0);
    run->command = run->limit_values != NULL ? take_strings(&cursor, end, h.b, 0) : NULL;
    run->env = run->command != NULL ? take_strings(&cursor, end, h.c, 0) : NULL;
    return run->env == NULL || h.b < 1 ? -1 : 1;
}

/* The command's side: new session, stdio, working directory, user, rlimits, default SIGPIPE and
 * SIGXFSZ, exec. Never returns; a failure goes to the status pipe. */
static void become_placed(struct placed_run *run, pid_t parent) {
    int status = run->status;
    const char *cwd = run->head[0], *executable = run->head[1];
    long uid = strtol(run->head[2], NULL, 10), gid = strtol(run->head[3], NULL, 10);
    setsid(); /* the worker already made a placed helper a session leader (then this fails, harmlessly) */
    int stdin_fd = run->count == 4 ? run->fds[0] : open("/dev/null", O_RDONLY);
    int stdio[3] = {stdin_fd, run->fds[run->count - 3], run->fds[run->count - 2]};
    for (int i = 0; i < 3; i++) {
        if (stdio[i] < 0 || dup2(stdio[i], i) < 0)
            placed_failed(status, "subprocess", 0, NULL, "the placed child could not set up its stdio");
    }
    /* Nothing else open but the status pipe (close-on-exec). */
    if (status > 3)
        close_from(3u, (unsigned)status - 1);
    close_from((unsigned)status + 1, ~0u);
    if (chdir(cwd) != 0)
        placed_failed(status, "os", errno, cwd, NULL);
    if (uid >= 0) {
        if (setgroups(0, NULL) != 0 || setregid((gid_t)gid, (gid_t)gid) != 0 ||
            setreuid((uid_t)uid, (uid_t)uid) != 0)
            placed_failed(status, "os", errno, NULL, NULL);
        die_with(parent); /* a change of credentials clears the parent-death signal */
    }
    for (int32_t i = 0; i < run->limits; i++) {
        long long value = strtoll(run->limit_values[2 * i + 1], NULL, 10);
        rlim_t limit = value < 0 ? RLIM_INFINITY : (rlim_t)value;
        struct rlimit both = {limit, limit};
        if (setrlimit((int)strtol(run->limit_values[2 * i], NULL, 10), &both) != 0) {
            char text[128];
            snprintf(text, sizeof text, "[Errno %d] %s", errno, strerror(errno));
            placed_failed(status, "subprocess", 0, NULL, text);
        }
    }
    signal(SIGPIPE, SIG_DFL);
    signal(SIGXFSZ, SIG_DFL);
    execve(executable, run->command, run->env);
    placed_failed(status, "os", errno, executable, NULL);
}

static void placing_failed(int status, const char *path, int err) {
    char text[512];
    snprintf(text, sizeof text, "entering cgroup %s: %s", path, strerror(err));
    placed_failed(status, "subprocess", 0, NULL, text);
}

/* The start of both helper roles: die with PARENT (argv[2]), keep only the control socket
 * (descriptor 3) and stdio, enter the cgroups listed after it; 0, or the errno of the cgroup
 * that could not be entered, with *path set. */
static int take_place(int argc, char **argv, pid_t *parent, const char **path) {
    *parent = (pid_t)strtol(argv[2], NULL, 10);
    die_with(*parent);
    control = 3;
    close_from(4u, ~0u);
    return enter_cgroups(argv + 3, argc - 3, path);
}

static int placed_main(int argc, char **argv) {
    pid_t parent;
    const char *placing_path = NULL;
    int placing_errno = take_place(argc, argv, &parent, &placing_path);
    struct placed_run run;
    const char *problem = NULL;
    int got = receive_placed_run(&run, &problem);
    if (got == 0)
        _exit(0); /* not needed after all: the worker closed our socket */
    if (got < 0 && run.status < 0)
        _exit(127);
    if (got < 0)
        placed_failed(run.status, "subprocess", 0, NULL, problem);
    if (placing_errno != 0)
        placing_failed(run.status, placing_path, placing_errno);
    become_placed(&run, parent);
    return 127;
}

/* A child of the caller's parent (CLONE_PARENT), with its own copy of memory, the caller waiting
 * until it has exec'd or ended (CLONE_VFORK); fork's return values. The raw system call takes
 * its arguments in another order on s390. */
static pid_t clone_for_parent(void) {
    unsigned long flags = CLONE_PARENT | CLONE_VFORK | SIGCHLD;
#if defined(__s390__) || defined(__s390x__)
    return (pid_t)syscall(SYS_clone, 0UL, flags, NULL, NULL, 0UL);
#else
    return (pid_t)syscall(SYS_clone, flags, 0UL, NULL, NULL, 0UL);
#endif
}

/* Role 3: a resident helper. It stays in its cgroups and starts one command per RUN, cloned
 * with CLONE_PARENT: each command is the worker's own child (reaped there with wait4, its
 * parent-death signal tied to the worker), born inside the cgroups, with no migration. With
 * CLONE_VFORK the helper resumes once the child has exec'd (or ended); it then appends the
 * child's pid to the exec status pipe as an 8-byte trailer ("pid:" and the pid, 0 when no
 * command was started) and closes its copies of the command's descriptors. So the pipe reads,
 * at end-of-file, the child's error (if any) and then the trailer: the worker learns the pid
 * from the pipe alone, and end-of-file comes at the exec, not whenever this helper is next
 * scheduled (measured: often only after the command had run to its end). End-of-file on the
 * socket ends the helper. The OOM killer never picks it (oom_score_adj -1000 where it may
 * lower it); each command gets the helper's original score back. */
static int resident_main(int argc, char **argv) {
    pid_t parent;
    const char *placing_path = NULL;
    if (take_place(argc, argv, &parent, &placing_path) != 0)
        _exit(1); /* the worker finds no helper there, and starts the command another way */
    prctl(PR_SET_DUMPABLE, 0); /* a command of the same user can neither trace nor read it */
    signal(SIGPIPE, SIG_IGN);
    char own_score[16] = {0};
    int score = open("/proc/self/oom_score_adj", O_RDWR | O_CLOEXEC);
    if (score >= 0) {
        (void)!read(score, own_score, sizeof own_score - 1);
        if (pwrite(score, "-1000", 5, 0) != 5)
            own_score[0] = '\0'; /* not allowed to lower it: nothing to give back */
        close(score);
    }
    for (;;) {
        struct placed_run run;
        const char *problem = NULL;
        int got = receive_placed_run(&run, &problem);
        if (got == 0 || (got < 0 && run.status < 0))
            _exit(0);
        pid_t child = 0;
        if (got > 0 && (child = clone_for_parent()) == 0) {
            die_with(parent); /* a fork clears the parent-death signal */
            if (own_score[0] != '\0') { /* the command's own entry, while it may still raise it */
                int own = open("/proc/self/oom_score_adj", O_WRONLY | O_CLOEXEC);
                if (own >= 0) {
                    (void)!write(own, own_score, strlen(own_score));
                    close(own);
                }
            }
            close(control);
            become_placed(&run, parent);
        }
        if (got < 0) {
            write_failure(run.status, "subprocess", 0, NULL, problem);
        } else if (child < 0) {
            char text[128];
            snprintf(text, sizeof text, "could not start the command: %s", strerror(errno));
            write_failure(run.status, "subprocess", 0, NULL, text);
            child = 0;
        }
        char trailer[8] = {'p', 'i', 'd', ':'};
        int32_t pid = (int32_t)child;
        memcpy(trailer + 4, &pid, 4); /* little-endian: the only byte order this is built for */
        (void)!write(run.status, trailer, sizeof trailer);
        free_run(&run);
    }
}

int main(int argc, char **argv) {
    if (argc >= 3 && strcmp(argv[1], "--placed") == 0)
        return placed_main(argc, argv);
    if (argc >= 3 && strcmp(argv[1], "--resident") == 0)
        return resident_main(argc, argv);
    if (argc != 2) {
        fprintf(stderr, "usage: expbuild-agent SOCKET | expbuild-agent --placed|--resident PARENT CGROUP_PROCS...\n");
        return 2;
    }
    prctl(PR_SET_DUMPABLE, 0);
    int spare;
    while ((spare = open("/dev/null", O_RDWR | O_CLOEXEC)) >= 0 && spare < 3) {
        fcntl(spare, F_SETFD, 0); /* stdio must be taken before descriptors arrive */
    }
    if (spare >= 3)
        close(spare);
    sigset_t chld;
    sigemptyset(&chld);
    sigaddset(&chld, SIGCHLD);
    sigprocmask(SIG_BLOCK, &chld, NULL);
    int children = signalfd(-1, &chld, SFD_CLOEXEC | SFD_NONBLOCK);
    if (children < 0)
        fail_fast("signalfd");
    control = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (control < 0)
        fail_fast("socket");
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(argv[1]) >= sizeof addr.sun_path) {
        errno = ENAMETOOLONG;
        fail_fast(argv[1]);
    }
    strcpy(addr.sun_path, argv[1]);
    if (connect(control, (struct sockaddr *)&addr, sizeof addr) != 0)
        fail_fast(argv[1]);
    struct inheritable at_start;
    note_inheritable(&at_start);
    say(MSG_READY, PROTOCOL_VERSION, 0);

    pid_t running = 0;  /* the command of the current request, until reaped */
    pid_t failed = 0;   /* a child that failed to exec: reaped without a word */
    for (;;) {
        struct pollfd watch[2] = {{control, POLLIN, 0}, {children, POLLIN, 0}};
        if (poll(watch, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            fail_fast("poll");
        }
        if (watch[1].revents & POLLIN) {
            struct signalfd_siginfo info;
            while (read(children, &info, sizeof info) > 0) {
            }
            int status;
            pid_t pid;
            while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
                if (pid == running) {
                    say(MSG_EXITED, status, 0);
                    running = 0;
                } else if (pid == failed) {
                    failed = 0;
                }
            }
        }
        if (watch[0].revents & (POLLIN | POLLHUP | POLLERR)) {
            struct header h;
            int fds[3];
            int got = receive_run(&h, fds);
            if (got == 0)
                return 0;
            if (h.kind == MSG_SIGNAL) {
                close_fds(fds);
                if (running > 0 && h.a > 0 && h.a < 65)
                    kill(running, h.a);
            } else if (h.kind == MSG_CHECK) {
                close_fds(fds);
                int changed = running != 0 ? 0 : changed_since(&at_start);
                say(MSG_CHECKED, running != 0 ? 2 : changed != 0, changed);
            } else if (h.kind == MSG_RUN && got == 1 && running == 0) {
                pid_t child = start_command(&h, fds);
                if (child > 0)
                    running = child;
                else if (child < 0)
                    failed = -child;
            } else {
                close_fds(fds);
                say(MSG_FAILED, EINVAL, STAGE_REQUEST);
                return 0;
            }
        }
    }
}
