"""nn.Module drop-ins built on fastllava.ops."""

from .projector import Projector
from .rmsnorm import RMSNorm

__all__ = ["Projector", "RMSNorm"]
