"""vlblocks: composable blocks for visual-linguistic Transformers."""
