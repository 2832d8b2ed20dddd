"""Sample Content templates, one per content type, shaped like the Content API's own examples."""

SAMPLE_TEMPLATES = {
    "twilio/text": {"body": "Hi {{1}}, your order {{2}} has shipped."},
    "twilio/media": {"body": "Your receipt, {{1}}", "media": ["https://example.com/receipt.pdf"]},
    "twilio/location": {"latitude": 37.7749, "longitude": -122.4194, "label": "Our store"},
    "twilio/call-to-action": {"body": "Track your order", "actions": [
        {"type": "URL", "title": "Track", "url": "https://example.com/track/{{1}}"}]},
    "twilio/quick-reply": {"body": "Was this helpful?", "actions": [
        {"type": "QUICK_REPLY", "title": "Yes", "id": "yes"}, {"type": "QUICK_REPLY", "title": "No", "id": "no"}]},
    "twilio/list-picker": {"body": "Pick a size", "button": "Sizes", "items": [
        {"item": "Small", "id": "s"}, {"item": "Large", "id": "l"}]},
    "twilio/card": {"title": "Your order is ready", "subtitle": "Pick it up today", "actions": [
        {"type": "QUICK_REPLY", "title": "On my way", "id": "coming"}]},
    "twilio/carousel": {"body": "New arrivals", "cards": [
        {"title": "Shoe", "body": "Size 42", "media": "https://example.com/shoe.png",
         "actions": [{"type": "URL", "title": "Buy", "url": "https://example.com/shoe"}]}]},
    "twilio/catalog": {"body": "Our catalog", "id": "1234567890", "title": "Shop"},
    "twilio/pay": {"body": "Pay for order {{1}}"},
    "twilio/flows": {"body": "Book an appointment", "button_text": "Book", "subtitle": "Takes 1 minute",
                     "pages": [{"id": "page1", "title": "When?", "layout": []}], "type": "flow"},
    "whatsapp/flows": {"body": "Tell us about your visit", "button_text": "Start", "flow_id": "1234567890123456"},
    "whatsapp/card": {"body": "Rate your delivery", "footer": "Thanks!", "actions": [
        {"type": "URL", "title": "Rate", "url": "https://example.com/rate"}]},
    "whatsapp/authentication": {"add_security_recommendation": True, "code_expiration_minutes": 5,
                                "actions": [{"type": "COPY_CODE", "copy_code_text": "Copy code"}]},
}
