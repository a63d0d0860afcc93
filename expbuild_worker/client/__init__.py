"""A small client for one worker: upload inputs, run an action, stream logs, write its outputs."""

from expbuild_worker.client._client import UPLOAD_CHUNK_BYTES, Execution, WorkerClient
from expbuild_worker.client._credentials import (
    ChannelSecurity,
    channel_credentials,
    open_channel,
    read_token,
    token_metadata,
)
from expbuild_worker.client._inputs import InputSpec, InputTree, LocalFile, collect_inputs, parse_input_spec
from expbuild_worker.client._logs import LogReassembler
from expbuild_worker.client._outputs import BlobReader, OutputError, OutputWriter

__all__ = [
    "UPLOAD_CHUNK_BYTES",
    "BlobReader",
    "ChannelSecurity",
    "Execution",
    "InputSpec",
    "InputTree",
    "LocalFile",
    "LogReassembler",
    "OutputError",
    "OutputWriter",
    "WorkerClient",
    "channel_credentials",
    "collect_inputs",
    "open_channel",
    "parse_input_spec",
    "read_token",
    "token_metadata",
]
