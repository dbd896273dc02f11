"""confplan: plan and run live migration of confidential VMs through an in-guest migration helper."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("confplan")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
