"""`inferstack bench`: an open-loop/closed-loop load generator for OpenAI-compatible servers.

It measures over HTTP like any client and never imports the engine or the gateway.
"""
