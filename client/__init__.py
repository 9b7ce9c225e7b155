"""The hospital side: the Flower ClientApp and the site's local state."""
