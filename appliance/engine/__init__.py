"""The engine: text decoding by llama.cpp.

`llama` (llama-cpp-python in this process: the signed chat template rendered in a sandbox, tokens
streamed), `server` (llama-server as the service's child: slots shared by concurrent answers), `prompt`
(the system prompt and the source blocks every model is trained and asked with). Imports `bundles`
(the installed generation it runs); nothing above it.
"""
