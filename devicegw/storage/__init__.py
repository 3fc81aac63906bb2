"""The one durable store: the SQLite file, the outbox, the session journal and the audit trail."""
