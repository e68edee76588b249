"""The slide: the single owner of counts, its intervals, the store, the outbox and the reports."""
