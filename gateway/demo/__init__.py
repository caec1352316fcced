"""The demo: a tool upstream with payments, email and search tools, and a scripted story."""
