"""The transport for untrusted networks: identities, the roster, TLS 1.3 links, rendezvous."""
