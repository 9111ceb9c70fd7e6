"""Built-in plugins. Every Plugin subclass (with a ``name``) defined in a module here is registered as a provider
of kind ``plugin`` by :mod:`apt.providers.plugins`."""
