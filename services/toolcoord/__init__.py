"""toolcoord: tool-call parsing, server-side tools, tool-response trimming and KV retention across tool pauses.

The modules here are plain Python (no torch); `tools/http_fetch.py` imports aiohttp only when a fetch runs.
"""
