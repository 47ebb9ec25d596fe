"""Kling's side: its endpoints and wire format, what its task bodies say, its account
API, and a stand-in of it for the demo and the tests (never imported by the server)."""
