"""The running gateway: device runners, link factories, the gateway itself and its health."""
