"""Distributed layer: communicators (the only users of torch.distributed), rank helpers."""

from secondorder.distributed.comm import Communicator, NoComm, TorchComm, build_communicator

__all__ = ["Communicator", "NoComm", "TorchComm", "build_communicator"]
