//! (placeholder until the blob module lands)
#[derive(Default)]
pub struct BlobWriter;
impl BlobWriter {
    pub fn new() -> Self {
        BlobWriter
    }
    pub fn add_fp16(&mut self, _v: &[f32]) -> u64 {
        todo!()
    }
    pub fn add_fp32(&mut self, _v: &[f32]) -> u64 {
        todo!()
    }
    pub fn finish(self) -> Vec<u8> {
        todo!()
    }
}
