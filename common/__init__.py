"""Code shared by the server, the client and the simulation: it imports none of them."""
