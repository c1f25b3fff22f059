"""The two HTTP wire dialects' shapes, as pydantic models: Anthropic's Messages API
(`anthropic.py`) and OpenAI's Chat Completions (`openai.py`). The API layer reads and writes
them; the upstream router forwards them."""
