//! The node: the task that owns the Swarm, the services around the store,
//! the client gateway (WebSocket + HTTP) and metrics.
