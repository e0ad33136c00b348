"""Default HTTP limits of our servers (no imports: the CLI reads them for its option defaults)."""

MAX_HEADER_BYTES = 64 * 1024       # request line + headers; nginx's default large buffers are 4 x 8 KiB
HEADER_TIMEOUT_S = 10.0            # a real client sends its headers in one packet
BODY_TIMEOUT_S = 30.0              # 32 MiB at ~1 MB/s; a stalled upload frees its slot after this
