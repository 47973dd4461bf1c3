"""Serving adapters and generating text: generation shared by predict, chat and the server (generation), the
server's adapter cache (cache), its dynamic batcher (batcher) and HTTP app (app). May import: lorakit.training and
every wing below it."""
