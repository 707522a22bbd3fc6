"""pushstream: push notifications to APNs, FCM and WNS as a Kafka stream processor."""

__version__ = "0.1.0"
