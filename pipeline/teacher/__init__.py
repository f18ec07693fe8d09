"""Teacher: the pretrained teacher, its DDIM chain, the trajectory spaces and its rectified form (the RNet and
its ring). Imports only core (docs/modules.md)."""
