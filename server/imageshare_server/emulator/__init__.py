"""An embedded ECS endpoint serving ``DescribeImageSharePermission``.

It checks signatures like ECS, answers in ECS's JSON and XML, and carries knobs for latency,
throttling and faults, so newcomers run the service without a cloud account and every test
runs against real sockets.
"""

from imageshare_server.emulator.admin import EmulatorAdmin, EmulatorAdminError
from imageshare_server.emulator.credentials import CredentialStore
from imageshare_server.emulator.data import Account, EmulatorData, Image, demo_data, load_data
from imageshare_server.emulator.knobs import Knobs
from imageshare_server.emulator.server import Emulator

__all__ = [
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
