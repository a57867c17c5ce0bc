"""The bundled Gemma 3 model: where its GGUF comes from, and its built-in turn and tool-call format."""
