"""Gadgetron side of DD-UGM: external gadget, persistent server, ISMRMRD/MRD I/O.

Modules:
    geometry   what the ISMRMRD header says about the encoding (matrices, FOV, centres)
    kspace     acquisitions or ReconData buffers -> prewhitened, centred cine k-space + mask
    images     reconstructed frames -> ISMRMRD images / ImageArray with Gadgetron's header fields
    settings   gadget settings from the chain's <configuration> properties and config/recon.yaml
    session    one scan stream: groups, triggers, reconstruction, fallback, error collection
    protocol   the wire: safe socket reads, error messages, MRD client/server messages
    external   the target Gadgetron starts: ``python -m gadgetron PORT gadgets.external reconstruct``
    server     ``ddugm serve``: persistent server for <connect port=.../> and MRD clients
    replay     ``ddugm recon IN.h5 OUT.h5``
    simulate   ``ddugm simulate``: images or phantom -> ISMRMRD raw file
"""
