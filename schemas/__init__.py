"""The Atrius wire protocol: message models, topic builders, binary codecs and pure sync rules.

This package imports nothing from ``agent`` or ``broker``; both depend on it.
"""

PROTOCOL_VERSION = "v1"
