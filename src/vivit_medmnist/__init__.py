"""ViViT for 3D medical volumes."""
