"""The processing stage: the Redis Streams -> Kafka bridge and the faust-streaming workers."""
