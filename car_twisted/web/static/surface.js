// A2UI basic-catalog renderer.
