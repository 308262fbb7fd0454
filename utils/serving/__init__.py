"""The server: OpenAI protocol, engine thread, HTTP app, served models, web UI."""
