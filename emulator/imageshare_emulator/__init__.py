"""An embedded ECS endpoint serving ``DescribeImageSharePermission``.

It checks signatures like ECS, answers in ECS's JSON and XML, and carries knobs for latency,
throttling and faults, so newcomers run the service without a cloud account and every test
runs against real sockets.
"""

from imageshare_emulator.admin import EmulatorAdmin, EmulatorAdminError
from imageshare_emulator.credentials import (
    DEMO_ACCESS_KEY_ID,
    DEMO_ACCESS_KEY_SECRET,
    CredentialStore,
)
from imageshare_emulator.data import Account, EmulatorData, Image, demo_data, load_data
from imageshare_emulator.knobs import Knobs
from imageshare_emulator.server import Emulator

__all__ = [
    "DEMO_ACCESS_KEY_ID",
    "DEMO_ACCESS_KEY_SECRET",
    "Account",
    "CredentialStore",
    "Emulator",
    "EmulatorAdmin",
    "EmulatorAdminError",
    "EmulatorData",
    "Image",
    "Knobs",
    "demo_data",
    "load_data",
]
