"""Serving adapters and generating text: generation shared by predict, chat and the server (generation), the
server's adapter cache (cache), its dynamic batcher (batcher), HTTP app (app) and OpenAI's API on it (openai_api,
openai_schema). May import: lorakit.training and every wing below it."""
