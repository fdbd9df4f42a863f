"""The HTTP server: tokenizer manager (HTTP process), scheduler process, detokenizer process."""
