"""Channels: ``send(frame)`` / ``recv(timeout)`` between a stage and one peer."""

from phalanx.comm.channel import Channel, ChannelClosed, ChannelError, ChannelTimeout
from phalanx.comm.local import LocalFabric

__all__ = ["Channel", "ChannelClosed", "ChannelError", "ChannelTimeout", "LocalFabric"]
