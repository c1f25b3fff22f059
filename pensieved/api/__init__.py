"""The HTTP surface: Tornado handlers speaking the Anthropic Messages API."""
