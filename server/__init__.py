"""fedseg server side: Flower SuperLink management, aggregation strategy and central validation."""
