"""dms: a peer-to-peer device management service for privacy-preserving data mining."""

__version__ = "0.1.0"
