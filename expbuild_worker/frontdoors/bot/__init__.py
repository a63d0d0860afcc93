"""The Remote Workers API front door: the worker as a bot of a BuildGrid scheduler, over the shared engine.

Unlike the other front doors it serves nothing: it calls the scheduler (Bots) and the
scheduler's CAS. It reads REAPI Actions and writes REAPI ActionResults with
``frontdoors._remote_actions``, the one copy of those rules, which the REAPI front door uses too
(no front door imports another).
"""

from expbuild_worker.frontdoors.bot._cas_client import DEFAULT_BATCH_BYTES, GrpcRemoteCas
from expbuild_worker.frontdoors.bot._leases import HANDED_BACK, LeaseWork, payload_digest
from expbuild_worker.frontdoors.bot._platform import CAPACITY, offered_properties, worker_message
from expbuild_worker.frontdoors.bot._session import SESSION_LOST, Bot, BotSettings, BotStats

__all__ = [
    "CAPACITY",
    "DEFAULT_BATCH_BYTES",
    "HANDED_BACK",
    "SESSION_LOST",
    "Bot",
    "BotSettings",
    "BotStats",
    "GrpcRemoteCas",
    "LeaseWork",
    "offered_properties",
    "payload_digest",
    "worker_message",
]
