"""The runtime every llmq stage shares: config, keys, message model, consumer loop, reclaimer."""
