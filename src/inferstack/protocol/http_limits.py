"""Default HTTP limits of our servers (no imports: the CLI reads them for its option defaults)."""

MAX_HEADER_BYTES = 64 * 1024       # request line + headers; nginx's default large buffers are 4 x 8 KiB
HEADER_TIMEOUT_S = 10.0            # a real client sends its headers in one packet
BODY_TIMEOUT_S = 30.0              # 32 MiB at ~1 MB/s; a stalled upload frees its slot after this
# An idle keep-alive connection is closed after this. It must outlast the clients' own pool expiry (httpx and
# so the OpenAI SDKs: 5 s, aiohttp 15 s, our gateway's scrapes 60 s): at uvicorn's 5 s a client reusing a
# connection at the moment the server closes it gets "server disconnected" for a request that never ran.
KEEP_ALIVE_S = 75.0                # nginx's default
