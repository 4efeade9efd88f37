"""fedseg site side: site checks, local data cache and the Flower ClientApp."""
