"""Task data in: URL policy, transport, disk cache, the one decoder per media kind, the resolvers, Label Studio's client."""
