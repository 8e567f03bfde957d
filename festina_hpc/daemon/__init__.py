"""festinad: the head-node daemon (HTTP gateway, routing into the policy, and later reconcile loops)."""
