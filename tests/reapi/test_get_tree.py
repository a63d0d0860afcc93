"""ContentAddressableStorage.GetTree: every directory of a tree once, breadth first, in pages."""

from __future__ import annotations

import grpc
import pytest
from _reapi_support import ReapiServer, pb_digest

from expbuild_worker.api.reapi import remote_execution_pb2 as re_pb


def _store_dir(reapi: ReapiServer, directory: re_pb.Directory) -> re_pb.Digest:
    [digest] = reapi.upload(directory.SerializeToString(deterministic=True))
    return digest


def _three_levels(reapi: ReapiServer) -> tuple[re_pb.Digest, list[re_pb.Directory]]:
    """root → (a, b); a → (a1, a2); b → (b1). Every directory distinct. Breadth-first order returned."""
    file = re_pb.FileNode(name="f", digest=reapi.upload(b"content")[0])
    a1 = re_pb.Directory(files=[re_pb.FileNode(name="a1.txt", digest=file.digest)])
    a2 = re_pb.Directory(files=[re_pb.FileNode(name="a2.txt", digest=file.digest)])
    b1 = re_pb.Directory(files=[re_pb.FileNode(name="b1.txt", digest=file.digest)])
    a = re_pb.Directory(
        directories=[
            re_pb.DirectoryNode(name="a1", digest=_store_dir(reapi, a1)),
            re_pb.DirectoryNode(name="a2", digest=_store_dir(reapi, a2)),
        ]
    )
    b = re_pb.Directory(directories=[re_pb.DirectoryNode(name="b1", digest=_store_dir(reapi, b1))])
    root = re_pb.Directory(
        files=[file],
        directories=[
            re_pb.DirectoryNode(name="a", digest=_store_dir(reapi, a)),
            re_pb.DirectoryNode(name="b", digest=_store_dir(reapi, b)),
        ],
    )
    return _store_dir(reapi, root), [root, a, b, a1, a2, b1]


def _pages(
    reapi: ReapiServer, root: re_pb.Digest, page_size: int, token: str = ""
) -> list[re_pb.GetTreeResponse]:
    return list(
        reapi.cas.GetTree(re_pb.GetTreeRequest(root_digest=root, page_size=page_size, page_token=token))
    )


@pytest.mark.parametrize("page_size", [0, 1, 2, 4], ids=["server-chooses", "one", "two", "four"])
def test_every_directory_once_breadth_first(reapi: ReapiServer, page_size: int) -> None:
    """Clients rebuild the tree from the pages, so each directory must come exactly once, in order."""
    root, expected = _three_levels(reapi)
    pages = _pages(reapi, root, page_size)
    got = [d for page in pages for d in page.directories]
    assert got == expected
    if page_size:
        assert all(len(p.directories) <= page_size for p in pages)
        assert len(pages) == -(-len(expected) // page_size)
    assert [bool(p.next_page_token) for p in pages] == [True] * (len(pages) - 1) + [False]


@pytest.mark.parametrize("page_size", [1, 2], ids=["one", "two"])
def test_a_page_token_resumes_where_the_page_ended(reapi: ReapiServer, page_size: int) -> None:
    """A client whose stream broke continues from a token and gets the rest, nothing twice."""
    root, expected = _three_levels(reapi)
    first = _pages(reapi, root, page_size)[0]
    rest = _pages(reapi, root, page_size, first.next_page_token)
    assert list(first.directories) + [d for p in rest for d in p.directories] == expected


def test_shared_subdirectories_come_once(reapi: ReapiServer) -> None:
    """Two names for one directory content are one Directory message in the tree."""
    leaf = _store_dir(reapi, re_pb.Directory(files=[re_pb.FileNode(name="x", digest=pb_digest(b""))]))
    root = _store_dir(
        reapi,
        re_pb.Directory(
            directories=[
                re_pb.DirectoryNode(name="p", digest=leaf),
                re_pb.DirectoryNode(name="q", digest=leaf),
            ]
        ),
    )
    got = [d for p in _pages(reapi, root, 0) for d in p.directories]
    assert len(got) == 2


def test_missing_directory_is_named(reapi: ReapiServer) -> None:
    """A tree with a hole is NOT_FOUND naming the absent directory and where it sits."""
    gone = pb_digest(re_pb.Directory(files=[re_pb.FileNode(name="nothing")]).SerializeToString())
    child = _store_dir(reapi, re_pb.Directory(directories=[re_pb.DirectoryNode(name="deep", digest=gone)]))
    root = _store_dir(reapi, re_pb.Directory(directories=[re_pb.DirectoryNode(name="sub", digest=child)]))
    with pytest.raises(grpc.RpcError) as info:
        _pages(reapi, root, 0)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert gone.hash in info.value.details()
    assert "sub/deep" in info.value.details()


def test_foreign_page_token_is_refused(reapi: ReapiServer) -> None:
    """A token from another tree (or invented) is refused, never silently misread as a position."""
    root, _ = _three_levels(reapi)
    other = _store_dir(reapi, re_pb.Directory())
    token = _pages(reapi, root, 1)[0].next_page_token
    for bad in (token + "x", "garbage"):
        with pytest.raises(grpc.RpcError) as info:
            _pages(reapi, root, 1, bad)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as info:
        _pages(reapi, other, 1, token)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
