"""Storage drivers: how an image's layers become a bundle's rootfs.

See :mod:`lamina.drivers.base` for the interface and
:mod:`lamina.drivers.registry` for how a driver is chosen.
"""

from lamina.drivers.base import (
    Capabilities,
    ChainLayer,
    ClaimRequest,
    Driver,
    DriverFactory,
    Mount,
    Usage,
    check_capabilities,
)

__all__ = ["Capabilities", "ChainLayer", "ClaimRequest", "Driver", "DriverFactory", "Mount",
           "Usage", "check_capabilities"]
