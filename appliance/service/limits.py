"""The service's bounds on what a caller may send or hold open."""

from appliance.schemas import MAX_PROMPT_CHARS  # noqa: F401  (a request bound, with the request models)

HEARTBEAT_S = 0.5  # a streamed answer with no text for this long sends an SSE comment
MAX_EMBED_INPUTS = 256
MAX_JSON_BODY = 8_000_000  # a chat request at its limits (64 messages of 32,000 characters) fits
BODY_TIMEOUT_S = 30.0  # to send a JSON body
UPLOAD_TIMEOUT_S = 600.0  # to send an upload of max_file_mb
HEADER_TIMEOUT_S = 10.0  # from connecting to a complete request head
MAX_CONNECTIONS = 256  # open at once; more are closed at once, so the service keeps its file descriptors
SO_PEERGROUPS = 59  # Linux: the peer's supplementary groups, as of connect()
UPLOAD_ROUTES = ("/appliance/documents/upload", "/appliance/draft")


