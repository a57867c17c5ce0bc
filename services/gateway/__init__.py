"""The REST/SSE layer: HTTP/JSON routes from google.api.http annotations, OpenAI-compatible endpoints."""
