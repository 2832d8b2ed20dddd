"""A local Twilio simulator (Messages API, Content API, WhatsApp's own window), for trying the proxy
without a Twilio account and for the project's own end-to-end tests."""

from .server import ServerThread
from .simulator import SANDBOX_ACCOUNT_SID, SANDBOX_AUTH_TOKEN, Simulator

__all__ = ["SANDBOX_ACCOUNT_SID", "SANDBOX_AUTH_TOKEN", "ServerThread", "Simulator"]
