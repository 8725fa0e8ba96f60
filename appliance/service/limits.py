"""The service's bounds on what a caller may send or hold open."""

from appliance.schemas import MAX_PROMPT_CHARS  # noqa: F401  (a request bound, with the request models)

HEARTBEAT_S = 0.5  # a streamed answer with no text for this long sends an SSE comment
MAX_EMBED_INPUTS = 256
MAX_QUERY_CHARS = 4_000  # a search or lookup query (a question is MAX_PROMPT_CHARS)
MAX_JSON_BODY = 8_000_000  # a chat request at its limits (64 messages of 32,000 characters) fits
BODY_TIMEOUT_S = 30.0  # to send a JSON body
UPLOAD_TIMEOUT_S = 600.0  # to send an upload of max_file_mb
UPLOAD_IDLE_S = 10.0  # an upload body that sends nothing for this long is dropped (408)
MIN_UPLOAD_RATE = 32_000  # bytes/s an upload must average once UPLOAD_IDLE_S have passed: no trickling
MAX_UPLOADS = 4  # upload bodies being received at once (each up to max_file_mb in memory)
MAX_UPLOADS_PER_PEER = 2  # of those, by one OS user or token; past either, 503 before a byte is read
MAX_HEADERS = 64  # in one request head (431 past it)
MAX_HEADER_BYTES = 16_384  # names and values of one request head together
HEADER_TIMEOUT_S = 10.0  # from connecting to a complete request head
TCP_HEADER_TIMEOUT_S = 3.0  # the same over TCP, where the head carries the bearer token
MAX_CONNECTIONS = 256  # Unix-socket connections open at once; more are closed at once (file descriptors)
MAX_PER_PEER = 32  # of those, one OS user's (or one TCP address's): nobody holds them all
NEW_PEER_RESERVE = 32  # the last connections are kept for users holding none yet
MAX_TCP_CONNECTIONS = 64  # TCP's own budget, apart from the socket's: tokens are checked only after the head
SO_PEERGROUPS = 59  # Linux: the peer's supplementary groups, as of connect()
UPLOAD_ROUTES = ("/appliance/documents/upload", "/appliance/draft")
