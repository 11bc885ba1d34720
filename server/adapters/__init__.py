"""The server's side of adapters: slot table (pure Python), host cache, packing into the model's
layer layout, the engine-side manager and the upload/delete service used by the API."""
