"""Senders: one client per provider (APNs, FCM, WNS) over the shared HTTP/2
transport in :mod:`pushstream.senders.http2`, and the loop that feeds them."""
