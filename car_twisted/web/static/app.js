// The dashboard page.
